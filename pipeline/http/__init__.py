"""The operator's view of a running pipeline: /metrics, /healthz, /ready, /tap and a status page."""
