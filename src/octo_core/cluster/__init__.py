"""Clusters: choosing a node per call among the providers of an appkey (balancing,
routing, fault tolerance)."""
