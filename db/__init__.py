"""The config database: tuned launch configs per (GPU, family, shape bucket, dtype, kernel version).

`ConfigStore` opens (creates, checks, migrates) the database; `export_configs` / `import_configs`
move configs between machines as JSON.
"""

from kernelhub.db.exchange import (export_configs, import_configs, load_export_file, parse_export,
                                   write_export_file)
from kernelhub.db.store import SCHEMA_VERSION, BestConfig, ConfigStore, TrialRecord, default_url

__all__ = ["SCHEMA_VERSION", "BestConfig", "ConfigStore", "TrialRecord", "default_url", "export_configs",
           "import_configs", "load_export_file", "parse_export", "write_export_file"]
