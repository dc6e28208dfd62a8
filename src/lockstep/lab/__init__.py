"""lockstep.lab."""
