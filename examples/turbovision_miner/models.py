"""The turbovision challenge and its answer, as the validator sends and reads them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class FrameIn(BaseModel):
    frame_id: int = Field(ge=0)
    url: str | None = None
    data: str | None = None          # base64 of a PNG or JPEG


class ChallengeRequest(BaseModel):
    challenge_id: str
    video_url: str | None = None
    image_url: str | None = None
    frames: list[FrameIn] | None = None


class ActionItem(BaseModel):
    frame: int = Field(ge=0)          # on the 25 fps count
    action: str
    confidence: float = Field(ge=0.0, le=1.0)


class Prediction(BaseModel):
    type: Literal["soccer_action"] = "soccer_action"
    items: list[ActionItem] = []


class ChallengeResponse(BaseModel):
    challenge_id: str
    prediction: Prediction
    processing_time: float
