"""Experiment configuration: dataclass schema, base.yaml and the validating loader."""

from repro.config.loader import ConfigError, config_to_dict, load_config, save_config
from repro.config.entries import (EXPERIMENTS_DIR, TABLES, UnknownEntryError, entry_path, list_entries,
                                    load_entry)
from repro.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "config_to_dict", "load_config", "save_config",
           "EXPERIMENTS_DIR", "TABLES", "UnknownEntryError", "entry_path", "list_entries", "load_entry"]
