"""The web dashboard under ``/ui``: server-rendered pages (Jinja2) with htmx for live parts,
signed in with the API's keys. :func:`mount` adds it to the API app."""

from backburner.dashboard.app import mount

__all__ = ["mount"]
