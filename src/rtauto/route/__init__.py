"""Routing: destinations (DICOM nodes, folders) and the delivery queue."""
