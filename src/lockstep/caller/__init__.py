"""lockstep.caller."""
