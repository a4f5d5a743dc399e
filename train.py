"""Kiln's RL driver: `python train.py --hf-checkpoint MODEL --prompt-data DATA ...`
(or `ray job submit -- python train.py ...`).

Flags come from the parts' config dataclasses (`python train.py --help`); `--config run.yaml` sets
any of them. The step loop lives in `orchestrator/driver.py`.
"""

from orchestrator.driver import main

if __name__ == "__main__":
    main()
