"""loraplex on Ray Serve: an ingress deployment in front of engine replicas, with requests
for an adapter routed to replicas already holding it (Ray Serve model multiplexing)."""
