"""lockstep.net."""
