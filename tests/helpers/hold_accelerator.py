"""`python tests/helpers/hold_accelerator.py`, started by a launcher: join the process group the way every trainer
does (`make_accelerator`), say so on stdout, then stay (a long training run, as far as the launcher can tell),
for the test that kills the launcher."""

import os
import time

from encoder.training import make_accelerator

accelerator = make_accelerator("no")
accelerator.wait_for_everyone()
print(f"worker {os.getpid()} ready", flush=True)
while True:
    time.sleep(1)
