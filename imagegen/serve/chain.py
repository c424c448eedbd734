"""The studio's latent job: an autoencoder, then a flow or ddpm model on its latents, as one process.

    python -m imagegen.serve.chain SPEC_JSON

SPEC_JSON: {"first": [...], "first_out": DIR, "then": [...], "seconds": S}. `first` is the `imagegen
train --model ae ...` command (its arguments after `python -m`), writing into DIR, a folder of its own;
`then` the model's, which this process becomes (exec) with `--set model.autoencoder=` the run folder the
first wrote and `--set train.time_limit=` what is left of the job's S seconds. The job (serve/jobs.py)
watches, cancels and limits this process as any training job. Cancelling and the watchdog signal the
whole process group, the autoencoder's process with it; the server's death (PR_SET_PDEATHSIG) signals
this process alone, which passes the SIGTERM on before it ends, so that nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MIN_MODEL_S = 1.0   # the model's time limit when the autoencoder took all of the budget: one step, saved


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    started = time.monotonic()
    running: list[subprocess.Popen] = []

    def end(signum, frame):   # the job is being stopped: the autoencoder's process goes too
        for process in running:
            # Not waited for here: this handler runs inside the main thread's wait() on the same process,
            # which holds its lock (a second wait() would never return). The signal ends it on its own.
            process.terminate()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, end)   # before the process starts: a stop at any moment reaches it
    running.append(subprocess.Popen([sys.executable, *spec["first"]]))
    code = running[0].wait()
    if code != 0:
        return code
    runs = sorted(p for p in Path(spec["first_out"]).iterdir() if (p / "config.json").is_file())
    if not runs:
        print(f"the autoencoder wrote no run folder in {spec['first_out']}", file=sys.stderr)
        return 1
    left = max(MIN_MODEL_S, spec["seconds"] - (time.monotonic() - started))
    print(f"the autoencoder is {runs[-1]}; the model has {left:.0f} s", flush=True)
    os.execv(sys.executable, [sys.executable, *spec["then"], "--set", f"model.autoencoder={runs[-1]}",
                              "--set", f"train.time_limit={left:.1f}"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
