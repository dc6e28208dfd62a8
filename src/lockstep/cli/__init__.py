"""lockstep.cli."""
