"""The pretraining job: a registered method's state and step in the run loop, the export."""
