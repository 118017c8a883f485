"""Wire schemas shared by the SDK and the server: the Connect command session of the
sandbox gateway (`command_session.proto`, generated into `command_session_pb2`).

`python -m fleetctl.proto.generate` regenerates the Python code after the schema
changes; a test keeps the checked-in copy equal to what the schema generates.
"""
