"""Tracking a run: the files the callbacks write while it trains, and what reads them after.

* ``run_files.py``: the format: where the two files are (``tsm/metrics.jsonl``,
  ``tsm/events.jsonl``), what a line holds, the crash-tolerant line reader;
* ``run_log.py``: ``RunLog``, the one writer of a run's events and metrics, which the monitor
  owns and the engine writes through;
* ``run_record.py``: ``load_run``, a run read back as one ``RunRecord`` (torn lines skipped,
  replayed steps of a resume dropped);
* ``report.py``: ``write_report``, the PNG and HTML page of one run (``lightning-aquila
  report``);
* ``compare.py``: ``compare_runs``, several runs against training tokens (``report
  --compare``);
* ``figure.py``: what the two figures share.

The monitor (``callbacks/monitor``) writes, this package reads and reports: nothing here
imports the callbacks. Only ``run_log.py`` imports torch and Lightning.
"""
