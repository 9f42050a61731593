"""Typed, validated run configuration. Imports no torch (and nothing from `loraforge.methods`)."""

from loraforge.config.image import ImageOptions
from loraforge.config.loader import config_from_dict, dump_config, load_config, save_config
from loraforge.config.methods import METHOD_OPTIONS, MethodOptions
from loraforge.config.schema import RunConfig, TaskType, parse_task_type

__all__ = ["ImageOptions", "METHOD_OPTIONS", "MethodOptions", "RunConfig", "TaskType", "config_from_dict",
           "dump_config", "load_config", "parse_task_type", "save_config"]
