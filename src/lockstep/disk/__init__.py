"""lockstep.disk."""
