"""Ray Tune experiment over the cost model's XGBoost parameters (thin entry point).

    python -m tune.costmodel --history DATA_DIR/history --registry DATA_DIR/models [--samples 8] [--quick]

The experiment itself lives in ``ray_qalloc.costmodel.tuning`` (also behind ``qalloc train``).
"""

from ray_qalloc.costmodel.tuning import main, train

__all__ = ["main", "train"]

if __name__ == "__main__":
    raise SystemExit(main())
