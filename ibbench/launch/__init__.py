"""Launchers decide where a sweep's runs execute; what a run does is train.run's alone."""
