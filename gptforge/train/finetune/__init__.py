"""The fine-tuning stages after pre-training, on the training core of gptforge/train/loop.py:

    tasks.py     built-in task families: generated problems with an exact checker
    examples.py  JSONL conversations -> token ids with a loss mask; SFT batches, packed or padded
    base.py      what both stages share: the starting weights with the chat tokens, held-out accuracy
    sft.py       supervised fine-tuning: the loss on the responses only
    rewards.py   reward functions: a task's checker, or the user's module:function
    ppo.py       the policy-gradient loss: PPO-clip over group-normalised advantages, KL, REINFORCE
    rl.py        reinforcement learning: rollouts, rewards and updates, step after step
    lifecycle.py ``make finetune``: pre-train, SFT, RL, and the held-out accuracy after each
"""
