"""Stage one on a Dask cluster: one task per part, the teacher loaded once per worker.

Imported only when used (kdcache.pipeline.executors loads it lazily): distributed is needed
here only.

* ``TeacherPlugin`` (a ``distributed.WorkerPlugin``) starts loading the teacher when it is
  attached to a worker (every worker, and workers that join or restart later), in a thread so
  the worker's event loop keeps answering the scheduler during a long load. On a LocalCluster
  made here with several GPUs, worker i takes cuda:i; on dask-cuda clusters each worker already
  sees its own GPU as cuda:0.
* ``_capture_task(shard)`` fetches the worker's session and runs ``capture_part``: the same
  function a single process runs. A task that dies with its worker is retried elsewhere by the
  scheduler; the part's lease makes the retry wait until the dead writer's lease is gone
  (at once on the same host, after expiry on another), so two writers never share a part.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace

import torch
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from distributed.scheduler import KilledWorker

from kdcache.pipeline.executors.base import (
    CaptureRun,
    absolute_paths,
    all_shards,
    available_cpus,
    finish,
)
from kdcache.stages.capture import CaptureConfig, CaptureSession, capture_part, load_session
from kdcache.stages.models.devices import use_cpu_threads
from kdcache.storage.errors import ConfigError, KDCacheError
from kdcache.storage.manifest import part_name
from kdcache.storage.writer import prepare_output

log = logging.getLogger(__name__)

PLUGIN = "kdcache-teacher"


class TeacherPlugin(WorkerPlugin):
    """Loads the capture session (teacher + tokenizer) once per worker."""

    name = PLUGIN

    def __init__(self, cfg: CaptureConfig, *, gpu_per_worker: bool = False) -> None:
        self.cfg = cfg
        self.gpu_per_worker = gpu_per_worker
        self._session: CaptureSession | None = None
        self._error: BaseException | None = None
        self._loading: threading.Thread | None = None

    def setup(self, worker) -> None:
        cfg = self.cfg
        gpus = torch.cuda.device_count()
        if self.gpu_per_worker and cfg.device in ("auto", "cuda") and gpus > 1:
            if isinstance(worker.name, int):  # LocalCluster workers are named 0, 1, ...
                cfg = replace(cfg, device=f"cuda:{worker.name % gpus}")

        def load() -> None:
            try:
                self._session = load_session(cfg, cfg.num_shards)
                log.info("worker %s: teacher loaded on %s", worker.name, self._session.device)
            except BaseException as e:  # re-raised by every task on this worker
                self._error = e

        self._loading = threading.Thread(target=load, daemon=True, name="kdcache-teacher-load")
        self._loading.start()

    def teardown(self, worker) -> None:
        self._session = None

    def session(self) -> CaptureSession:
        self._loading.join()
        if self._error is not None:
            raise self._error
        return self._session


def _session() -> CaptureSession:
    session = get_worker().plugins[PLUGIN].session()
    use_cpu_threads(session.cfg.cpu_threads, session.device)  # per thread for OpenMP
    return session


def _prepare_task(replace_stale: bool) -> dict:
    """Refuse (or clear, with --replace) a cache made with other settings; runs once."""
    session = _session()
    prepare_output(session.cfg.out, session.identity, replace=replace_stale)
    return session.identity.to_dict()


def _capture_task(shard: int):
    session = _session()
    return capture_part(session, shard)


def _open_client(scheduler, workers: int | None, processes: bool, cfg: CaptureConfig):
    """(client, the LocalCluster made here or None, the worker plugin's options)."""
    # distributed sets its loggers to INFO when imported; follow kdcache's level instead (-v)
    level = max(logging.getLogger().getEffectiveLevel(), logging.INFO)
    logging.getLogger("distributed").setLevel(level)
    if scheduler is None:
        gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 0
        # CPU: as many workers as the cores hold at the capture's torch threads each
        n = workers or min(cfg.num_shards, gpus or max(1, available_cpus() // cfg.cpu_threads))
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,  # task errors come back to the client as one line
        )
        return Client(cluster), cluster, {"gpu_per_worker": True}
    if isinstance(scheduler, Client):
        return scheduler, None, {}
    # an address (tcp://host:8786) or a cluster object (SLURMCluster, LocalCUDACluster, ...)
    return Client(scheduler), None, {}


def run_on_dask(
    cfg: CaptureConfig,
    shards: list[int],
    run: CaptureRun,
    *,
    scheduler=None,
    workers: int | None = None,
    processes: bool = True,
) -> None:
    """Capture ``shards`` on the cluster; fills ``run.parts`` (in part order) and run.workers."""
    # A task retried after its worker died waits (bounded) for the dead writer's lease to expire.
    # The CPU threads are fixed here, once: every worker computes with the same (bit-identical
    # parts on CPU; a GPU worker ignores them).
    cfg = replace(
        cfg,
        progress=False,
        lease_wait=max(cfg.lease_wait, 1.5 * cfg.lease_seconds),
        cpu_threads=cfg.cpu_threads or torch.get_num_threads(),
    )
    client, cluster, options = _open_client(scheduler, workers, processes, cfg)
    try:
        if cluster is None and not client.scheduler_info()["workers"]:
            client.wait_for_workers(1, timeout=600)
        run.workers = len(client.scheduler_info()["workers"])
        log.info(
            "dask: %d workers (%s); %d parts", run.workers, client.scheduler.address, len(shards)
        )
        client.register_plugin(TeacherPlugin(cfg, **options), name=PLUGIN)
        token = uuid.uuid4().hex[:8]
        client.submit(_prepare_task, cfg.replace, key=f"kdcache-prepare-{token}").result()
        futures = {
            client.submit(_capture_task, s, key=f"kdcache-{part_name(s)}-{token}"): s
            for s in shards
        }
        results, errors = {}, []
        for future in as_completed(futures):
            shard = futures[future]
            try:
                results[shard] = future.result()
                log.info(results[shard].line())
            except KilledWorker as e:
                errors.append(
                    f"{part_name(shard)}: its worker died on every try ({e}); "
                    "the part resumes from its last flush when you rerun"
                )
            except KDCacheError as e:
                errors.append(f"{part_name(shard)}: {e}")
        run.parts = [results[s] for s in sorted(results)]
        if errors:
            raise KDCacheError(
                f"{len(errors)} of {len(shards)} parts failed (the others are committed; rerun to "
                f"finish): {errors[0]}"
                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
            )
    finally:
        if client is not scheduler:  # a Client passed in stays open for its owner
            client.close()
        if cluster is not None:
            cluster.close()


def run_dask(
    cfg: CaptureConfig,
    *,
    scheduler: object | None = None,
    workers: int | None = None,
    processes: bool = True,
) -> CaptureRun:
    """Capture every part on a Dask cluster, one task per part.

    scheduler: None (a LocalCluster of ``workers`` workers, 1 thread each, made and closed
    here), a scheduler address ("tcp://host:8786"), or a running cluster / Client object."""
    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)
    cfg.validate()
    if cfg.tensor_parallel > 1:
        raise ConfigError(
            f"--tensor-parallel {cfg.tensor_parallel} splits one teacher over torchrun's ranks; "
            "a Dask worker is one process: run torchrun --nproc_per_node N kdcache cache "
            "--tensor-parallel N --shard-index env (N ranks per part) instead"
        )
    cfg, shards = all_shards(cfg)
    run = CaptureRun(out=cfg.out, executor="dask", workers=0)
    run_on_dask(cfg, shards, run, scheduler=scheduler, workers=workers, processes=processes)
    return finish(run, t0)
