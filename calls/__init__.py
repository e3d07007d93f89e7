"""The workflows and their rules: what happens to a call, decided in one place each.

- ``admission``: the voice webhook (charge, scenario, global cap, token) and the stream's start;
- ``outbound``: placing a call for a frontend (``call.start``);
- ``status``: the status vocabulary and rules (ranks, finals, refunds) and Twilio's callbacks.

The handlers translate requests into calls of these and their results into TwiML, JSON or
close codes; ``services.Services`` is what the workflows may use.
"""
