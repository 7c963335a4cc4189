"""Request and response bodies, by API family."""
