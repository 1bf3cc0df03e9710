"""HTTP: the FastAPI app factory, thin routers, error mapping and auth."""
