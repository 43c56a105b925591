"""The mixed (colocated) worker service: prefill and decode in one engine, the PD baseline."""
