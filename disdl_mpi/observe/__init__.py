"""Observability: phase timers, the Chrome-trace timeline, progress display and run outputs."""
