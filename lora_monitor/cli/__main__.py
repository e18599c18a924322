"""`python -m lora_monitor.cli`: the same as the `lora-monitor` command."""
import sys

from lora_monitor.cli import main

sys.exit(main())
