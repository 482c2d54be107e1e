"""hvd-pcdarts: distributed PC-DARTS architecture search and retraining on Horovod."""

__version__ = "0.1.0"
