"""The demo's control: the same fine-tuning of the same baseline, without gradient reversal.

    python -m jaxvpr.main --config configs/demo_nogrl.py --workdir workdir/demo_nogrl
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("demo", Path(__file__).with_name("demo.py"))
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config():
    c = _demo.get_config()
    c.grl.enabled = False
    c.data.target_folder = ""
    return c
