"""Input data: the cluttered-digits dataset, image ops and the grain pipeline the trainer calls.

    from vitoken import data
    info = data.dataset_info(config.data)
    batches = data.train_iterator(config.data, global_batch_size=256, seed=0)
"""
from vitoken.data.pipeline import (
    DataInfo,
    dataset_info,
    default_data_config,
    eval_iterator,
    train_iterator,
)

__all__ = ["DataInfo", "dataset_info", "default_data_config", "eval_iterator", "train_iterator"]
