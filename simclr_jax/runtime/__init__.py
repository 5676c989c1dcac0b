"""What every run shares: mesh and collectives, the run loop, metric writer, platform flags."""
