"""``python -m hf_kvcache_plugin.config --schema configs/schema.json``: write the JSON schema of the YAML file."""

import argparse

from .schema import write_json_schema

parser = argparse.ArgumentParser(prog="python -m hf_kvcache_plugin.config", description=__doc__)
parser.add_argument("--schema", required=True, metavar="PATH", help="where to write the JSON schema")
write_json_schema(parser.parse_args().schema)
