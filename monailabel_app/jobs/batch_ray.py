"""The batch job on Ray Data (``medgemma-label batch --engine ray``, extra ``[ray]``).

The driver plans as the local engine does (hashing, skipping what is done, :func:`batch.prepare`); Ray
Data then sends each study to one of ``--workers`` model replicas (actors: one model load each, one GPU
each where the cluster has GPUs, else one CPU). A replica reads the study and writes its outputs with the
local engine's own :func:`batch.read_study`, so the layout is the same; the driver appends each record to
the same manifest as it arrives. Input and output folders must be visible to every worker (one machine,
or a shared file system).
"""

from __future__ import annotations

import json
import os
import sys

from .batch import Manifest, Plan, Study, read_study


class ReaderReplica:
    """One model replica: loads the model once, reads the studies of each batch (of one)."""

    def __init__(self, model, device, precision, out, question, max_new_tokens, threads, language="auto"):
        import torch

        from ..io.ct import Limits
        from ..reader import Reader

        torch.set_num_threads(max(1, threads))
        self.reader = Reader(model, device=device, precision=precision, limits=Limits())
        self.out, self.question, self.max_new_tokens, self.language = out, question, max_new_tokens, language

    def __call__(self, batch: dict) -> dict:
        records = [
            json.dumps(read_study(self.reader, Study(str(i), str(p), str(h)), self.out, self.question, self.max_new_tokens,
                                  self.language))
            for i, p, h in zip(batch["study"], batch["path"], batch["hash"])
        ]
        return {"record": records}


def run_ray(args, manifest: Manifest, plan: Plan) -> list[dict]:
    """Read the plan's studies on Ray (a local instance, or the cluster at ``args.address``)."""
    try:
        import ray
    except ImportError as e:
        from ..errors import InputError

        raise InputError("--engine ray needs Ray: pip install 'monailabel-medgemma[ray]'") from e
    from tqdm import tqdm

    for r in plan.records:
        manifest.append(r)
    if not plan.todo:
        return []
    local = not args.address
    workers = args.workers or 2
    if local:  # one CPU per replica, one more for Ray Data's own tasks; a small object store (records are small)
        ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=args.verbose,
                 object_store_memory=256 * 2**20, ignore_reinit_error=True)
    else:
        ray.init(address=args.address, log_to_driver=args.verbose, ignore_reinit_error=True)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if not args.workers and gpus:
            workers = gpus
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        items = [{"study": s.id, "path": os.path.abspath(s.path), "hash": s.hash} for s in plan.todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // max(workers, 1)) if not local else 1
        read = ds.map_batches(
            ReaderReplica, batch_size=1, concurrency=workers, num_gpus=1 if gpus else 0, num_cpus=1,
            fn_constructor_kwargs=dict(model=args.model, device=args.device, precision=args.precision,
                                       out=os.path.abspath(args.out), question=args.question,
                                       max_new_tokens=args.max_new_tokens, threads=cpus, language=args.language),
        )
        finished = []
        with tqdm(total=len(items), unit="study", desc=f"pre-labelling on Ray ({workers} replicas)",
                  disable=args.no_progress, file=sys.stderr, dynamic_ncols=True) as bar:
            for row in read.iter_rows():
                record = json.loads(row["record"])
                manifest.append(record)
                finished.append(record)
                bar.update(1)
        return finished
    finally:
        ray.shutdown()
