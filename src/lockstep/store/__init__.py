"""lockstep.store."""
