"""lockstep.vm."""
