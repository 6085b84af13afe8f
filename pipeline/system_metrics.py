"""System metrics of a training run (``tracking.system_metrics: true``), recorded by MLflow's own monitor.

MLflow's ``SystemMetricsMonitor`` samples CPU and memory (psutil), disk and network and, where NVML sees
an NVIDIA GPU (nvidia-ml-py), each GPU's utilization, memory and power, in a thread of the trainer, and
logs them as ``system/…`` metrics of the run through MLflow's API: a few points every 10 s (MLflow's
default; ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` sets another), apart from the per-step metric writer.
CPU utilization is the whole machine's, not this process's.

A re-attached run continues the series: the monitor resumes from the run's last stored ``system/``
step, so a killed and restarted training appends to the same run instead of writing step 0 again.
The monitor stops when its run ends: ``MonitoredRun.end`` stops it before the run is closed, and every
exit of pipeline.stages.train_stage (finished, diverged, pruned, failed, interrupted) ends the run.
MLflow's loop also exits by itself once the run is no longer RUNNING. MLflow is imported only when the
option is on.
"""

from __future__ import annotations

import functools

CPU_KEY = "system/cpu_utilization_percentage"
MEMORY_KEY = "system/system_memory_usage_percentage"
THREAD_NAME = "SystemMetricsMonitor"  # the name MLflow gives the monitor's thread
SAMPLING_INTERVAL_S = 10.0  # MLflow's default; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL takes precedence


@functools.cache
def _monitor_class():
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # At INFO MLflow says "Skip logging GPU metrics. Set logger level to DEBUG…" on every CPU-only run,
    # plus start and stop lines; our one line per run says the same. Its warnings (a failed log) still show.
    logging.getLogger(SystemMetricsMonitor.__module__).setLevel(logging.WARNING)

    class PrimedMonitor(SystemMetricsMonitor):
        """MLflow's monitor without its meaningless first CPU reading.

        psutil.cpu_percent() measures since the previous call from the same thread id: a new thread's first
        reading spans no time (we saw 0.0 and 100.0), or, when the id is reused from an earlier monitor's
        thread, whatever span that one left. MLflow's loop reads at the start of each interval and logs
        the reading after it, so the first point of every run, and of every resumed part, was such a
        reading. Taking psutil's baseline here, one interval before MLflow's first reading, makes that
        reading cover one interval like every later one.
        """

        def monitor(self):
            import psutil

            psutil.cpu_percent()
            if not self._shutdown_event.wait(self.sampling_interval):
                super().monitor()

    return PrimedMonitor


def start(run_id: str, tracking_uri: str, sampling_interval: float = SAMPLING_INTERVAL_S):
    """A started monitor logging into `run_id`, its steps continuing after the run's last system/ step.

    `sampling_interval` in seconds; MLflow lets $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL override it.
    """
    monitor = _monitor_class()(run_id, sampling_interval=sampling_interval, resume_logging=True,
                               tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def gpu_monitored(monitor) -> bool:
    """Whether the monitor found a GPU to sample (NVML for NVIDIA, else ROCm)."""
    return any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in monitor.monitors)


def describe(monitor) -> str:
    """One line for the log: what is recorded, how often, and why there are no GPU metrics if there are none."""
    gpu = ", GPU" if gpu_monitored(monitor) else "; no GPU metrics: no GPU visible to NVML"
    return (f"system metrics every {float(monitor.sampling_interval):g} s into the MLflow run as system/… "
            f"(CPU, memory, disk, network{gpu})")


class MonitoredRun:
    """A tracking sink (pipeline.tracking.MlflowRun) whose run's system metrics are recorded while it is
    open. Every attribute is the wrapped sink's; ``end`` stops the monitor first, so its last points are
    stored before the run is closed and no monitor thread outlives the run."""

    def __init__(self, sink, monitor):
        self._sink, self._monitor = sink, monitor

    def __getattr__(self, name: str):
        return getattr(self._sink, name)

    def stop(self) -> None:
        """Stop the monitor and store what it holds; idempotent, never raises (MLflow logs its own errors)."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()

    def end(self, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        self.stop()
        self._sink.end(status, tags)


def monitored(sink, log=print, sampling_interval: float = SAMPLING_INTERVAL_S):
    """`sink` with its run's system metrics recorded until ``end`` (a ``MonitoredRun``); `sink` itself
    when it has no MLflow run, or when the monitor cannot start (a warning: training goes on without)."""
    if getattr(sink, "run_id", None) is None:
        return sink
    from pipeline.tracking import tracking_uri

    try:
        monitor = start(sink.run_id, tracking_uri(), sampling_interval)
    except Exception as e:  # optional diagnostics must not stop a training
        log(f"[train] warning: system metrics are not recorded for this run: {type(e).__name__}: {e}")
        return sink
    log(f"[train] {describe(monitor)}")
    return MonitoredRun(sink, monitor)

