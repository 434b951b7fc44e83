"""The Flower side: the ServerApp (server_app), the ClientApp (client_app) and what a node holds
(node), the grid executor the server's round loop uses (executor), and wire, the one module that
defines every key and record layout that crosses between them."""
