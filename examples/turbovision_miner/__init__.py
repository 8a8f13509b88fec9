"""A turbovision (Bittensor subnet 44, private track) miner on the engine.

``server`` is the FastAPI app the validator POSTs challenges to (run it with
``uvicorn examples.turbovision_miner.server:app --port 8000``), ``models`` the request
and the answer, ``spotter`` the action-spotting model behind it (a STAND-IN unless
``TURBOVISION_MODEL`` names a real one) and the engine processors around it.
"""
