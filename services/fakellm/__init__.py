"""fakellm: a scripted LLM provider speaking the OpenAI and Anthropic wire formats."""
