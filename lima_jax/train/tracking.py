"""Weights & Biases tracking (`config.train.wandb`): the rows of metrics.jsonl, the config and
each epoch's dev answers (a table) logged to one W&B run per work dir.

The run's id is kept in WORKDIR/wandb_run_id, so a resumed training run continues the same
W&B run. Its local files go to WORKDIR/wandb (a work dir in a bucket: W&B's default folder).
`WANDB_MODE=offline` logs there without network (`wandb sync` uploads later). wandb is an
optional dependency, imported only when tracking is on; only process 0 logs.
"""

import secrets

from lima_jax import storage

RUN_ID_FILE = "wandb_run_id"


class WandbRun:
    def __init__(self, workdir, config: dict, project: str):
        import wandb  # optional: config.check_end_of_run has checked it is installed

        self.wandb = wandb
        folder = storage.path(workdir)
        id_file = folder / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
            folder.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        local = None if storage.is_remote(folder) else str(folder)
        self.run = wandb.init(project=project, id=run_id, resume="allow", config=config, dir=local,
                              name=folder.name)

    def log(self, step: int, row: dict) -> None:
        """One row at `step`; rows of the same step (train and dev metrics) join W&B's one row."""
        self.run.log(row, step=step)

    def table(self, step: int, key: str, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            self.run.log({key: self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                         step=step)

    def close(self) -> None:
        self.run.finish()
