# Inside the VM: serve the sample image with nginx on 127.0.0.1, run the demo on it.
mkdir -p /srv/www && cp /demo/sample.img /srv/www/sample.img
nginx-start /srv/www 8080
exec bash /demo/steps.sh http://127.0.0.1:8080/sample.img /usr/local/bin/ublk-http
