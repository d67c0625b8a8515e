"""Sandbox networking on the host: egress policy and proxy, its CA, preview URLs."""
