"""lockstep.execd."""
