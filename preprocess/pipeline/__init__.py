"""The pipeline: configuration (``config``), one shard's work (``shard``), datatrove steps and the
merge into ``index.json`` (``steps``), and the driver (``driver``).

What callers outside the preprocessor use, ``PreprocessConfig`` and ``run_pipeline``, is importable
from here; everything else from its module.
"""

from preprocess.pipeline.config import PreprocessConfig
from preprocess.pipeline.driver import run_pipeline

__all__ = ["PreprocessConfig", "run_pipeline"]
