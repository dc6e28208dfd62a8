"""lockstep.rpc."""
