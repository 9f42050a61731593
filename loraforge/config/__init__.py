"""Typed, validated run configuration. Imports no torch."""

from loraforge.config.image import ImageOptions
from loraforge.config.loader import config_from_dict, dump_config, load_config, save_config
from loraforge.config.schema import METHOD_DEFAULT_LR, RunConfig, TaskType, parse_task_type

__all__ = ["ImageOptions", "METHOD_DEFAULT_LR", "RunConfig", "TaskType", "config_from_dict", "dump_config",
           "load_config", "parse_task_type", "save_config"]
