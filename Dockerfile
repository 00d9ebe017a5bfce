# The Sallyport image: one bundled file on Node.js 24 with the kernel tools the agent spawns.
#   npm ci && npm run build && docker build -t sallyport:dev .
# The same image runs the controller (`sallyport controller`) and the agent (`sallyport agent`).
FROM node:24-bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset iproute2 conntrack kmod \
 && rm -rf /var/lib/apt/lists/*
COPY dist/ /opt/sallyport/
ENTRYPOINT ["node", "/opt/sallyport/sallyport.mjs"]
