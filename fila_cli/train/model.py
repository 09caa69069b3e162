"""The model being trained: the Hybrid Encoder (fila's own, as inference runs it) feeding a
transformers causal LM through ``inputs_embeds``, and which of its parameters train in each stage.

A sample's sequence is ``[text before <image>] [packed visual tokens] [text after]``, exactly the
order the llama.cpp backend decodes at inference. The loss is summed over label tokens here; the
loop divides by the global batch's label count, so accumulation and data parallelism give the
gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fila_cli.train.chat import IGNORE_INDEX, TokenizedConversation
from fila_cli.train.data import Conversation
from fila_cli.vision.anyres import AnyresImage
from fila_cli.vision.model.encoder import HybridEncoder

# Parameter groups, each with its own learning rate in the optimiser.
FUSION_GROUP, PROJECTOR_GROUP, CONVNEXT_GROUP, LLM_GROUP, VIT_GROUP = "cvfm", "projector", "convnext", "llm", "vit"
# Prefixes of each group's parameter names in TrainModel.
GROUP_PREFIXES = {
    FUSION_GROUP: ("vision.cvfm.",),
    PROJECTOR_GROUP: ("vision.projector.", "vision.image_newline"),
    CONVNEXT_GROUP: ("vision.convnext.",),
    LLM_GROUP: ("llm.",),
    VIT_GROUP: ("vision.vit.",),
}


@dataclass(frozen=True)
class PreparedSample:
    """A conversation ready to train on: tokenised, its image found and its length known."""

    index: int  # position in the data file
    conversation: Conversation
    tokens: TokenizedConversation
    n_visual: int

    @property
    def length(self) -> int:
        return self.tokens.n_text_tokens + self.n_visual


def group_of(name: str) -> str | None:
    for group, prefixes in GROUP_PREFIXES.items():
        if name.startswith(prefixes):
            return group
    return None


class TrainModel(nn.Module):
    def __init__(self, vision: HybridEncoder, llm: nn.Module):
        super().__init__()
        self.vision = vision
        self.llm = llm

    @property
    def _no_split_modules(self) -> list[str]:
        """The LLM's decoder layer class(es): FSDP's transformer auto-wrap (accelerate's
        TRANSFORMER_BASED_WRAP) makes each layer one shard unit when the config names none."""
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return list(getattr(llm, "_no_split_modules", None) or [])

    def set_trainable(self, groups: set[str], lora: bool = False) -> None:
        """Freeze everything, then unfreeze the named groups (of the LLM only its LoRA when ``lora``)."""
        for name, param in self.named_parameters():
            group = group_of(name)
            trains = group in groups and not (lora and group == LLM_GROUP and "lora_" not in name)
            param.requires_grad_(trains)

    def trainable_by_group(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups.setdefault(group_of(name) or "other", []).append((name, param))
        return groups

    def enable_gradient_checkpointing(self) -> None:
        self.vision.vit.gradient_checkpointing = True
        # HF recomputes layers only in training mode; the LLM has no dropout that this would turn on.
        # Recent transformers name it activation checkpointing; older releases gradient checkpointing.
        if hasattr(self.llm, "activation_checkpointing_enable"):
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.llm.train()
        if hasattr(self.llm, "enable_input_require_grads"):
            self.llm.enable_input_require_grads()

    def sequence(self, sample: PreparedSample, image: Image.Image | AnyresImage) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [L, d], labels [L]) of one sample."""
        return self._assemble(sample, self.vision.forward_batch([self._page(image)])[0])

    def _page(self, image: Image.Image | AnyresImage) -> AnyresImage:
        return image if isinstance(image, AnyresImage) else self.vision.preprocess(image)

    def _assemble(self, sample: PreparedSample, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample's text embeddings around its visual tokens [n_visual, d], and its labels."""
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        if visual.shape[0] != sample.n_visual:
            raise RuntimeError(f"sample {sample.conversation.sample_id}: {visual.shape[0]} visual tokens, {sample.n_visual} planned")
        tokens = sample.tokens
        n_before = len(tokens.before_ids)
        text = embed(torch.tensor(tokens.before_ids + tokens.after_ids, device=device))  # [n_text, d]
        embeddings = torch.cat([text[:n_before], visual.to(text.dtype), text[n_before:]])
        labels = torch.tensor(tokens.before_labels + [IGNORE_INDEX] * sample.n_visual + tokens.after_labels, device=device)
        return embeddings, labels

    def batch(self, samples: list[PreparedSample], images: list[Image.Image] | list[AnyresImage]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds [B, L, d], labels [B, L], attention mask [B, L]), right-padded. The pages
        (images, or pages already preprocessed) are encoded as one batch."""
        visuals = self.vision.forward_batch([self._page(image) for image in images])
        sequences = [self._assemble(sample, visual) for sample, visual in zip(samples, visuals)]
        longest = max(embeddings.shape[0] for embeddings, _ in sequences)
        width = sequences[0][0].shape[1]
        device, dtype = sequences[0][0].device, sequences[0][0].dtype
        # Right padding, masked out of attention and of the loss.
        inputs = torch.zeros(len(samples), longest, width, device=device, dtype=dtype)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, device=device)
        mask = torch.zeros(len(samples), longest, device=device, dtype=torch.long)
        for row, (embeddings, sample_labels) in enumerate(sequences):
            inputs[row, : embeddings.shape[0]] = embeddings
            labels[row, : sample_labels.shape[0]] = sample_labels
            mask[row, : embeddings.shape[0]] = 1
        return inputs, labels, mask

    def forward(self, samples: list[PreparedSample], images: list[Image.Image] | list[AnyresImage]) -> torch.Tensor:
        """Summed next-token cross-entropy over the micro-batch's label tokens."""
        inputs, labels, mask = self.batch(samples, images)
        logits = self.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits  # [B, L, V]
        # Position t predicts token t + 1.
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
