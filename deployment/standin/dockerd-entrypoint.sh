#!/bin/bash
# Same behaviour as the stock pytorch/torchserve:0.12.0 entrypoint:
# "serve" starts TorchServe with the image's config (token authorization off),
# anything else is run as given; the container then stays up until stopped.
set -e

if [[ "$1" = "serve" ]]; then
    shift 1
    torchserve --start --ts-config /home/model-server/config.properties --disable-token-auth
else
    eval "$@"
fi

# prevent docker exit
tail -f /dev/null
