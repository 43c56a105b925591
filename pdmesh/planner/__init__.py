"""Capacity planning for PD disaggregation: profile the engine, fit a latency model, simulate, plan.

``pdmesh profile`` measures prefill and decode latencies on this machine (``profile.py``),
``model.py`` fits a latency model to them, ``simulate.py`` predicts SLO attainment for a workload and a
number of prefill and decode instances, and ``pdmesh plan`` (``plan.py``) searches the P:D split.
"""
