"""Members of a programme: profiles, states, real-name binding and family groups."""
