"""Serving the trained models with TorchServe, and loading a server with requests.

torchserve.py   the runner: one TorchServe from deployment/config.properties, started, waited for until
                every model is ready (deployment/readiness.py, the one readiness check), stopped by its PIDs
__main__.py     `python -m serving start|status|stop`: what make serve, make status and make stop run
loadtest.py     concurrent requests against a server: the load tests and bench/serving.py
"""
